"""udocker as the stack drives it: image references in every spelling a user may give, real pulls."""

from __future__ import annotations

from pathlib import Path

import pytest

from installer import runtime
from installer.errors import ImageError

from .conftest import PRODUCTION_IMAGES


@pytest.mark.parametrize(("ref", "local_name", "registry"), [
    ("postgres:15", "postgres:15", None),
    ("library/postgres:15", "postgres:15", None),
    ("docker.io/library/postgres:15", "postgres:15", None),
    ("index.docker.io/library/postgres:15", "postgres:15", None),
    ("postgres", "postgres:latest", None),
    ("netflixoss/metaflow_metadata_service:v2.5.1", "netflixoss/metaflow_metadata_service:v2.5.1", None),
    ("docker.io/netflixoss/metaflow_metadata_service", "netflixoss/metaflow_metadata_service:latest", None),
    ("registry.example:5000/team/img:tag", "team/img:tag", "https://registry.example:5000"),
    ("registry.example/team/img", "team/img:latest", "https://registry.example"),
    ("localhost:5000/img:1", "img:1", "https://localhost:5000"),
])
def test_every_spelling_maps_to_the_name_udocker_keeps(ref: str, local_name: str, registry: str | None) -> None:
    spec = runtime.image_spec(ref)
    assert (spec.local_name, spec.registry) == (local_name, registry)


@pytest.mark.parametrize("ref", ["", "postgres:", "team//img:1", "registry.example:5000/"])
def test_malformed_references_are_refused_clearly(ref: str) -> None:
    with pytest.raises(ImageError) as caught:
        runtime.image_spec(ref)
    assert "not an image reference" in str(caught.value)


def test_a_pull_by_any_spelling_is_found_by_every_other(tmp_path: Path, registry: str) -> None:
    """The production PostgreSQL name has one part: udocker lists it without `library/`."""
    name = PRODUCTION_IMAGES["postgres"]
    assert "/" not in name.split(":")[0]
    udocker = runtime.prepare(tmp_path / "udocker", tmp_path / "bin", lambda _: None)
    assert not udocker.has_image(name)
    assert udocker.pull(f"docker.io/library/{name}", registry, lambda _: None) is True
    listed = udocker.run("images", what="udocker images")
    assert name in listed and f"library/{name}" not in listed
    for spelling in (name, f"library/{name}", f"docker.io/library/{name}"):
        assert udocker.has_image(spelling), spelling
        # has_image reads udocker's folders; `udocker images` itself must agree.
        assert runtime.image_spec(spelling).local_name in listed.split(), spelling
        assert udocker.pull(spelling, registry, lambda _: None) is False  # nothing pulled twice
    assert not udocker.has_image(name.split(":")[0] + ":no-such-tag")
    assert udocker.ensure_container(f"library/{name}", "probe", lambda _: None) is True
    assert (udocker.container_root("probe") / "usr" / "lib" / "postgresql").is_dir()
