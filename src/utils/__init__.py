"""Small runtime helpers."""
