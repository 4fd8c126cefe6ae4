"""The applications: the command line, the demo, the local no-code page."""
