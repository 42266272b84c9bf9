"""Which backend runs and how backends differ; the one reader of the process environment."""
