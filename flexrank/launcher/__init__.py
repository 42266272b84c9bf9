"""Command line and launch helpers (`flexrank ...`)."""
