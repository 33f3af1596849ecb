"""The historical import path of the app factory: ``uvicorn --factory service.app:create_app`` works too."""

from service.main import create_app

__all__ = ["create_app"]
