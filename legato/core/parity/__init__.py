"""Coded inference after Parity Models (SOSP'19): erasure codes over queries and predictions
(`codes.py`), coding groups as a serving frontend keeps them (`group.py`), the packaged datasets
(`datasets.py`) and the framework-free half of training and judging a parity model
(`training.py`). Framework trainers live in the adapters
(`legato.adapters.torch.parity`)."""

from legato.core.parity.codes import (AdditionEncoder, ConcatenationEncoder, Decoder, Encoder,
                                      SubtractionDecoder, make_encoder, parity_target)
from legato.core.parity.group import PARITY, CodingGroup, GroupFormer
from legato.core.parity.training import evaluate, overall_accuracy, sample_groups

__all__ = ["PARITY", "AdditionEncoder", "CodingGroup", "ConcatenationEncoder", "Decoder",
           "Encoder", "GroupFormer", "SubtractionDecoder", "evaluate", "make_encoder",
           "overall_accuracy", "parity_target", "sample_groups"]
