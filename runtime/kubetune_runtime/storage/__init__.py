"""Storage: URIs, backends (local, S3, Hub), verified publishing and downloads."""
