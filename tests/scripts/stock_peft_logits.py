"""Logits of exported adapters as a user without flexrank gets them: plain transformers + PeftModel.from_pretrained.

Usage: stock_peft_logits.py JOBS.json — a list of {"base", "adapter", "nf4": bool, "ids", "out"}; writes each
job's logits to its "out" file. Runs in a fresh process that never imports flexrank (checked at the end)."""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def load_base(path: str, nf4: bool):
    if not nf4:
        return AutoModelForCausalLM.from_pretrained(path)
    # The quantization flexrank's QLoRA recipes use on CPU (NF4, double quant, fp32 compute, bf16 storage).
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map={"": "cpu"})


def main(jobs_file: str) -> None:
    for job in json.loads(open(jobs_file).read()):
        model = PeftModel.from_pretrained(load_base(job["base"], job["nf4"]), job["adapter"]).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(job["ids"])).logits
        torch.save(logits, job["out"])
    assert not any(name == "flexrank" or name.startswith("flexrank.") for name in sys.modules), "flexrank imported"


if __name__ == "__main__":
    main(sys.argv[1])
