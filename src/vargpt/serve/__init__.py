"""HTTP API over the engine (``create_app``); needs the ``serve`` extra (fastapi, uvicorn)."""

from vargpt.serve.api import create_app
from vargpt.serve.schemas import Limits

__all__ = ["create_app", "Limits"]
