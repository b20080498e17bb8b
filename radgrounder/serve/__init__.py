"""The HTTP API and web viewer (``radgrounder serve``); needs the ``serve`` extra
(fastapi, uvicorn, python-multipart)."""

from radgrounder.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
