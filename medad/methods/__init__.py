"""medad.methods."""
