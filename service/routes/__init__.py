"""One router per resource: studies, their results, and operations."""
