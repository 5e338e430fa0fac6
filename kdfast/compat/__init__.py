"""Drop-in adapters for code written against other KD libraries."""
