"""The official recipe unless a flag says otherwise: no gradient clipping, and the loss averaged per micro-batch
(transformers 4.37's behaviour) with the token-level mean of transformers 5 as an option; each gives the loss it
claims on two micro-batches with different answer lengths."""
import pytest
import torch
from torch.utils.data import Dataset

from piip_llava.data.dataset import DataCollatorForSupervisedDataset
from piip_llava.models import PiipLlavaForConditionalGeneration, load_preset
from piip_llava.train.arguments import PiipTrainingArguments
from piip_llava.train.trainer import PiipTrainer


class Samples(Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def _samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for length, answer in ((12, 1), (20, 9)):  # 1 vs 9 supervised tokens
        ids = torch.randint(3, 400, (length,), generator=g)
        labels = torch.full_like(ids, -100)
        labels[-answer:] = ids[-answer:]
        out.append({"input_ids": ids, "labels": labels, "pixel_values": None})
    return out


def _per_sample_losses(model, samples):
    """(mean loss, supervised-token count) of each sample alone, with the initial weights."""
    out = []
    with torch.no_grad():
        for s in samples:
            loss = model(input_ids=s["input_ids"][None], labels=s["labels"][None]).loss
            out.append((float(loss), int((s["labels"][1:] != -100).sum())))
    return out


def test_official_defaults():
    args = PiipTrainingArguments(output_dir="unused", use_cpu=True)
    assert args.max_grad_norm == 0.0 and args.loss_normalization == "micro_batch"
    with pytest.raises(ValueError, match="loss_normalization"):
        PiipTrainingArguments(output_dir="unused", use_cpu=True, loss_normalization="sum")


@pytest.mark.parametrize("mode", ["micro_batch", "tokens"])
def test_loss_normalisation_gives_the_loss_it_claims(tmp_path, mode):
    torch.manual_seed(0)
    model = PiipLlavaForConditionalGeneration(load_preset("tiny-piip2_clip_64-128"))
    samples = _samples()
    (l1, n1), (l2, n2) = _per_sample_losses(model.eval(), samples)
    claimed = (l1 + l2) / 2 if mode == "micro_batch" else (l1 * n1 + l2 * n2) / (n1 + n2)
    other = (l1 * n1 + l2 * n2) / (n1 + n2) if mode == "micro_batch" else (l1 + l2) / 2
    assert abs(claimed - other) > 0.05  # the two definitions really differ on this data
    args = PiipTrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=1,
                                 gradient_accumulation_steps=2, max_steps=1, learning_rate=0.0, logging_steps=1,
                                 save_strategy="no", report_to="none", loss_normalization=mode, seed=0,
                                 disable_tqdm=True, dataloader_num_workers=0)
    trainer = PiipTrainer(model=model.train(), args=args, train_dataset=Samples(samples),
                          data_collator=DataCollatorForSupervisedDataset(0, 64))
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged and abs(logged[0] - claimed) < 1e-4, (logged, claimed, other)
