"""Agent environments and the demonstrations their experts produce."""
