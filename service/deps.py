"""Route dependencies: the app state, reached through `Annotated` so tests can override it."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.app_state
    return state


StateDep = Annotated[AppState, Depends(get_state)]
