"""Coalition games: the :class:`Game` protocol and every game shapkern evaluates, in one place.

A game maps coalitions bool (B, M, N), the present patches of each of B images, to values
(B, M, K). Estimators (:mod:`shapkern.explainers`), the shapiq integration and training consume
games; the model games are built on the engine (:mod:`shapkern.engine`).
"""

from shapkern.games.base import Game, SelfExplaining, TabulatedGame, ValueFunction, restrict
from shapkern.games.image_text import (
    ImageTextGame,
    SelfExplainingImageText,
    Texts,
    encode_texts,
    image_text_game,
)
from shapkern.games.models import MODES, Mode, PackedGame, PixelGame, SelfExplainingGame, model_game

__all__ = [
    "MODES",
    "Game",
    "ImageTextGame",
    "Mode",
    "PackedGame",
    "PixelGame",
    "SelfExplaining",
    "SelfExplainingGame",
    "SelfExplainingImageText",
    "TabulatedGame",
    "Texts",
    "ValueFunction",
    "encode_texts",
    "image_text_game",
    "model_game",
    "restrict",
]
