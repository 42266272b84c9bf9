"""In-place distillation for the elastic supernet (BigNAS; Once-for-All's progressive shrinking): a sampled subnet
other than the maximal one also learns the maximal subnet's output on the same batch,

    loss = (1 - weight) * labels' loss + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)),

the KL summed over the items that carry a label (a causal LM's tokens after the shift, a classifier's examples)
and normalised exactly as the Trainer normalised the labels' loss (controllers.base.LossNormalisation), so that
one process, DDP, ZeRO-3 and FSDP2 give the same losses. Masks, the teacher's forward and the bookkeeping are the
elastic controller's (controllers/elastic.py); this module is the arithmetic.

No host synchronisation: the labelled items are selected by multiplying with a mask, not by boolean indexing."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # transformers' label for "no loss here"


def labelled(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, mask): the logits rows that are predictions of a label, and a boolean mask of those carrying one.
    Token logits (batch, sequence, vocabulary) predict the next token: position t is scored against label t + 1
    (or `shift_labels` t, as padding-free collators give them), as transformers' causal-LM loss does; a
    classifier's logits (batch, classes) have one row per example."""
    if logits.dim() == 3:
        if batch.get("shift_labels") is not None:
            return logits, batch["shift_labels"].ne(IGNORE_INDEX).to(logits.device)
        return logits[:, :-1], batch["labels"][:, 1:].ne(IGNORE_INDEX).to(logits.device)
    return logits, batch["labels"].reshape(logits.shape[0], -1)[:, 0].ne(IGNORE_INDEX).to(logits.device)


@dataclass(frozen=True)
class Distillation:
    weight: float = 0.5
    temperature: float = 1.0

    def term(self, student: torch.Tensor, teacher: torch.Tensor, batch: dict,
             items: torch.Tensor | int | None = None, factor: float = 1.0) -> torch.Tensor:
        """T^2 x KL(teacher || student) at temperature T over the labelled items of `batch`, normalised as the
        labels' loss is: summed then divided by `items`, or (None) averaged over the micro-batch's labelled items;
        times `factor`. In float32, as transformers computes the causal-LM loss."""
        rows, mask = labelled(student, batch)
        teacher_rows, _ = labelled(teacher.detach(), batch)
        t = self.temperature
        log_student = F.log_softmax(rows.float() / t, dim=-1)
        log_teacher = F.log_softmax(teacher_rows.float() / t, dim=-1)
        per_item = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
        total = (per_item * mask).sum() * (t * t)
        if items is None:
            items = mask.sum().clamp(min=1)
        elif torch.is_tensor(items):
            items = items.to(total.device)
        return total / items * factor

    def mix(self, loss: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        return (1 - self.weight) * loss + self.weight * term
