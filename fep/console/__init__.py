"""The insurance office's read-only web console: the day, the month and what needs a person, in a browser."""
