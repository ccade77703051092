"""`pipeline("translation")` and `pipeline("text2text-generation")` for sequence-to-sequence models.

transformers 5 removed both tasks (they raise a KeyError pointing to chat models), but a translation model is what
this package is. So this module writes them by hand, on transformers' own `Pipeline` base (which does batching,
devices and the generation-parameter plumbing), and registers them under their old names when the package is
imported. Outputs have the v4 shape: `[{"translation_text": ...}]` and `[{"generated_text": ...}]`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

from . import cpu_inference


class Text2TextGenerationPipeline(Pipeline):
    """Source text in, generated text out, through the model's `generate()` and its generation config (for this
    package's models: beam 4, length penalty 0.6, input length + 50, §6.1).

    Generation parameters (`num_beams`, `max_new_tokens`, ...) may be given when the pipeline is built or per
    call. Input is a string or a list of strings; `batch_size` batches them.

    Built on CPU in fp32 with oneDNN, the pipeline converts its model once, in place, for CPU inference
    (`cpu_inference.optimize_for_cpu_inference`: oneDNN linear layers holding the same parameters; nothing changes
    where that does not apply). A model passed in as an object is that model: `cpu_inference.restore_linears(model)`
    undoes the conversion, for training it again.
    """

    _pipeline_calls_generate = True
    _load_tokenizer = True
    return_name = "generated"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # puts the model on its device
        cpu_inference.optimize_for_cpu_inference(self.model)  # a no-op where `cpu_inference.applies` is false

    def _sanitize_parameters(
        self, truncation: bool | None = None, max_source_length: int | None = None, **generate_kwargs: Any
    ) -> tuple[dict, dict, dict]:
        preprocess = {}
        if truncation is not None:
            preprocess["truncation"] = truncation
        if max_source_length is not None:
            preprocess["max_length"] = max_source_length
        return preprocess, generate_kwargs, {}

    def __call__(self, inputs: str | list[str], **kwargs: Any) -> list[dict[str, str]] | list[list[dict[str, str]]]:
        if not isinstance(inputs, (str, list)) or (
            isinstance(inputs, list) and not all(isinstance(x, str) for x in inputs)
        ):
            raise ValueError(f"{type(self).__name__} takes a string or a list of strings, got {type(inputs).__name__}.")
        results = super().__call__(inputs, **kwargs)
        if isinstance(inputs, list) and all(len(result) == 1 for result in results):
            return [result[0] for result in results]  # one output per input: a flat list, as transformers 4 gave
        return results

    def preprocess(self, text: str, truncation: bool = True, max_length: int | None = None) -> dict[str, torch.Tensor]:
        return self.tokenizer(text, truncation=truncation, max_length=max_length, return_tensors="pt")

    def _forward(self, model_inputs: dict[str, torch.Tensor], **generate_kwargs: Any) -> dict[str, torch.Tensor]:
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs)
        output_ids = self.model.generate(**model_inputs, **generate_kwargs)  # (B * num_return_sequences, L)
        batch = model_inputs["input_ids"].shape[0]
        return {"output_ids": output_ids.reshape(batch, -1, output_ids.shape[-1])}

    def postprocess(self, model_outputs: dict[str, torch.Tensor]) -> list[dict[str, str]]:
        texts = self.tokenizer.batch_decode(model_outputs["output_ids"][0], skip_special_tokens=True)
        return [{f"{self.return_name}_text": text.strip()} for text in texts]


class TranslationPipeline(Text2TextGenerationPipeline):
    """Translation: as text2text-generation, with results under `translation_text`."""

    return_name = "translation"


def register_pipelines() -> None:
    """Make `pipeline("translation")` and `pipeline("text2text-generation")` work again (see the module docstring).

    `PIPELINE_REGISTRY.register_pipeline` is transformers' public API for custom tasks, but v5 refuses removed task
    names before it looks in the registry, so the names are also taken off its removed-tasks list.
    """
    for task, pipeline_class in (
        ("translation", TranslationPipeline),
        ("text2text-generation", Text2TextGenerationPipeline),
    ):
        REMOVED_TASKS.pop(task, None)
        if task not in PIPELINE_REGISTRY.supported_tasks:
            PIPELINE_REGISTRY.register_pipeline(
                task, pipeline_class=pipeline_class, pt_model=AutoModelForSeq2SeqLM, type="text"
            )
