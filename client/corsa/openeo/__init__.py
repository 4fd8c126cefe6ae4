"""openEO: the published process graphs (UDPs), the embedded engine that runs them, batch jobs on
back ends, the APEx catalogue entries."""
