"""Services of the TEST stand-in image for netflixoss/metaflow_metadata_service."""
