// Asset of the Metaflow UI stand-in (test image): checks the backend ping.
(function () {
  var base = window.METAFLOW_SERVICE || "/api";
  var out = document.getElementById("backend");
  fetch(base + "/ping").then(function (r) { return r.text(); })
    .then(function (t) { out.textContent = "Backend: " + t; })
    .catch(function (e) { out.textContent = "Backend: unreachable (" + e + ")"; });
})();
