"""OPENEO_BACKEND_CONFIG of the test server: the dummy back end's (basic auth: john / JOHN!!!)."""
from openeo_driver.dummy.dummy_config import config  # noqa: F401
