"""medad.transforms."""
