"""Shipped recipe configs (``qflax-train --config <name>``); each file's ``get_config()`` returns a ConfigDict."""
