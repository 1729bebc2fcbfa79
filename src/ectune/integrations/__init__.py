"""Bridges to other libraries. Each subpackage imports its library only when it is imported itself."""
