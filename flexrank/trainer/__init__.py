"""Config, model building, data, the rank-controlled adapter layer, controllers, the Trainer subclass, export."""
