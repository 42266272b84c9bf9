"""Records from bundled tasks, files and hub datasets; tokenization, its cache, collators."""
