"""S3 test server fixtures (SeaweedFS): written with the storage work."""
