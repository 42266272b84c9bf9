"""The Trainer subclass and its arguments built once from the recipe."""
