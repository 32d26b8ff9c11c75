"""Swift test server fixtures: written with the storage work."""
