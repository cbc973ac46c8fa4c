"""Student training on trajectory records."""
