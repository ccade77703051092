"""sacreBLEU as an `evaluate` metric that loads offline: ``evaluate.load(<path of this folder>)``.

`evaluate` 0.4 bundles no metric scripts and ``evaluate.load("sacrebleu")`` fetches one from the Hub, so the package
ships this one and loads it by absolute path (see ``hf_vanilla_transformer.metrics``).
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU from sacreBLEU (Post, 2018), the metric of the paper's Table 2 (§6.1)."
_INPUTS = """
Args:
    predictions (`list[str]`): detokenized hypotheses.
    references (`list[str]` or `list[list[str]]`): one reference, or several, per prediction.
    tokenize (`str`, *optional*, defaults to "13a"): sacreBLEU's tokenizer.
Returns:
    score (`float`): BLEU, 0 to 100; bp (`float`): brevity penalty; precisions (`list[float]`): 1- to 4-gram.
"""


class LocalSacrebleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_INPUTS,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, tokenize: str = "13a") -> dict:
        references = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
        if len({len(refs) for refs in references}) > 1:
            raise ValueError("every prediction needs the same number of references")
        streams = [list(stream) for stream in zip(*references, strict=True)]  # sacreBLEU wants one list per stream
        bleu = sacrebleu.corpus_bleu(predictions, streams, tokenize=tokenize)
        return {
            "score": bleu.score,
            "bp": bleu.bp,
            "precisions": bleu.precisions,
            "sys_len": bleu.sys_len,
            "ref_len": bleu.ref_len,
        }
