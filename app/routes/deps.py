"""Dependencies as named aliases, so route signatures read like prose."""

from typing import Annotated

from fastapi import Depends, Request

from app.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
