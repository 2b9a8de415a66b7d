"""Dependencies as named aliases, so route signatures read like prose."""

from typing import Annotated

from fastapi import Depends, Request

from app.auth import Client
from app.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_client(request: Request) -> Client:
    """The caller, as `app.auth.Guard` named it (its key, or its address)."""
    return request.state.client


ClientDep = Annotated[Client, Depends(get_client)]
