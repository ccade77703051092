"""Token-based batching (§5.1): "sentence pairs were batched together by approximate sequence length. Each training
batch contained a set of sentence pairs containing approximately 25000 source tokens and 25000 target tokens."

`Seq2SeqTrainer` only batches by a fixed number of sentences (``group_by_length`` sorts, but keeps the count fixed),
so the sampler is written here, as fairseq's ``--max-tokens`` batching is. The trainer that uses it also keeps the
model's generation config as the model had it through evaluation (`TokenBatchSeq2SeqTrainer.prediction_step`).
"""

import copy
import logging
from collections.abc import Iterator, Sequence
from functools import partial

import datasets
import numpy as np
import pyarrow.compute as pc
from torch.utils.data import DataLoader, Sampler
from transformers import Seq2SeqTrainer
from transformers.trainer_utils import seed_worker

logger = logging.getLogger(__name__)


class TokenBatchSampler(Sampler[list[int]]):
    """Batches of at most `max_tokens` padded tokens per side: ``len(batch) * max(length) <= max_tokens`` (§5.1).

    Args:
        lengths (`Sequence[int]`): per example, the longer of its source and target length in tokens.
        max_tokens (`int`): the token budget of one batch on one process (source and target each).
        shuffle (`bool`, *optional*, defaults to `True`): tie-break equal lengths and order the batches at random.
        seed (`int`, *optional*, defaults to 0): with `set_epoch`, fixes the order; every process must use the same.
        num_replicas (`int`, *optional*, defaults to 1): data-parallel processes. The number of batches is made a
            multiple of it (by halving the largest batches), so every process runs the same number of steps and
            every example is used exactly once per epoch, with no batch repeated.
        rank (`int`, *optional*): yield only this process's batches (every `num_replicas`-th one). Leave it `None`
            when a wrapper shards the batches itself, as accelerate's ``BatchSamplerShard`` does under `Trainer`:
            it gives batch ``k`` to process ``k % num_replicas``, the same share as ``rank`` would.

    Examples are sorted by length (ties in random order) and cut greedily into batches, fairseq-style; batches are
    then shuffled. Sorting the whole dataset rather than shuffled chunks keeps the number of batches the same in every
    epoch, which `Trainer` needs: it sizes the epoch and the learning-rate schedule from ``len(dataloader)``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int | None = None,
    ):
        if max_tokens <= 0 or num_replicas <= 0:
            raise ValueError(f"max_tokens ({max_tokens}) and num_replicas ({num_replicas}) must be positive")
        if rank is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) < num_replicas:
            raise ValueError(f"{len(self.lengths)} examples cannot be shared by {num_replicas} processes")
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.bounds = _split_to_multiple(_greedy_bounds(np.sort(self.lengths), max_tokens), num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch`; `Trainer` calls this before each epoch (also through ``BatchSamplerShard``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.bounds) // (self.num_replicas if self.rank is not None else 1)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        order = order[np.argsort(self.lengths[order], kind="stable")]  # by length; equal lengths stay shuffled
        batches = [order[start:end].tolist() for start, end in self.bounds]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.rank is not None:
            batches = batches[self.rank :: self.num_replicas]
        return iter(batches)


def _greedy_bounds(sorted_lengths: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """Cut ascending lengths into [start, end) slices whose padded size ``count * longest`` fits `max_tokens`."""
    bounds, start = [], 0
    for i, length in enumerate(sorted_lengths.tolist()):
        if i > start and (i - start + 1) * length > max_tokens:
            bounds.append((start, i))
            start = i
    bounds.append((start, len(sorted_lengths)))
    too_long = int((sorted_lengths > max_tokens).sum())
    if too_long:
        logger.warning("%d examples are longer than max_tokens=%d; each gets a batch of its own", too_long, max_tokens)
    return bounds


def _split_to_multiple(bounds: list[tuple[int, int]], multiple: int) -> list[tuple[int, int]]:
    """Halve the largest batches until the count divides by `multiple`: equal steps per process, no repeats."""
    bounds = list(bounds)
    while len(bounds) % multiple:
        i = max(range(len(bounds)), key=lambda k: bounds[k][1] - bounds[k][0])
        start, end = bounds[i]
        if end - start < 2:
            raise ValueError(f"cannot make {len(bounds)} single-example batches a multiple of {multiple}")
        middle = (start + end) // 2
        bounds[i : i + 1] = [(start, middle), (middle, end)]
    return bounds


def example_lengths(dataset: datasets.Dataset, columns: Sequence[str] = ("input_ids", "labels")) -> np.ndarray:
    """Per example, the longest of the token columns (source ``input_ids``, target ``labels``), read with Arrow."""
    table = dataset.select_columns(list(columns)).with_format("arrow")[:]
    per_column = [pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False) for name in columns]
    return np.maximum.reduce(per_column)


class TokenBatchSeq2SeqTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` whose training batches hold about `max_tokens` tokens per side and optimizer step (§5.1).

    `max_tokens` is the budget of one update, as the paper states it ("each training batch contained ... approximately
    25000 source tokens and 25000 target tokens", on 8 GPUs): it is shared by all data-parallel processes and
    gradient-accumulation steps, so the same flag gives the same recipe on 1 or 8 GPUs. Each process's batches hold
    ``max_tokens // (processes * gradient_accumulation_steps)`` tokens (`tokens_per_batch`); fairseq's
    ``--max-tokens`` is that per-process figure instead. ``per_device_train_batch_size`` is ignored for training;
    evaluation still uses ``per_device_eval_batch_size``.

    The update is the gradient of the whole batch's mean token loss, however its tokens fall into batches and
    processes: Trainer counts the update's target tokens (`num_items_in_batch`, gathered over processes by
    ``average_tokens_across_devices``, its default) and the model divides its summed token losses by that count
    (its `accepts_loss_kwargs`). Without it, each batch's mean would weigh the same whatever its token count.
    """

    def __init__(self, *args, max_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_tokens = max_tokens
        shares = self.accelerator.num_processes * self.args.gradient_accumulation_steps
        self.tokens_per_batch = max_tokens // shares
        if self.tokens_per_batch < 1:
            raise ValueError(
                f"max_tokens={max_tokens} is the budget of one optimizer step; shared by "
                f"{self.accelerator.num_processes} processes x {self.args.gradient_accumulation_steps} accumulation "
                "steps it leaves no token per batch"
            )
        if self.accelerator.num_processes > 1 and not self.args.average_tokens_across_devices:
            logger.warning(
                "average_tokens_across_devices is off: each process's tokens are weighed by its own count, so the "
                "update is not the gradient of the whole batch's mean loss"
            )
        logger.info(
            "Token batches: about %d tokens per side and update = %d process(es) x %d accumulation step(s) x %d "
            "tokens per batch",
            self.tokens_per_batch * shares,
            self.accelerator.num_processes,
            self.args.gradient_accumulation_steps,
            self.tokens_per_batch,
        )

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if not isinstance(self.train_dataset, datasets.Dataset):
            raise TypeError("token batching needs a datasets.Dataset with input_ids and labels columns")
        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        sampler = TokenBatchSampler(
            example_lengths(dataset),
            self.tokens_per_batch,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            # The full batch list, a multiple of the process count: accelerate's BatchSamplerShard deals it out
            # round-robin, so with `even_batches` no batch is repeated.
            num_replicas=self.accelerator.num_processes,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        prepared = self.accelerator.prepare(loader)
        _forward_set_epoch(prepared, sampler)
        return prepared

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        # transformers 5's Seq2SeqTrainer.prediction_step writes every GenerationConfig default (max_length 20,
        # top_k 50, ...) into the model's own generation config, to size the padding of its predictions. The model
        # would then save them as its settings, and each later generate() that sets max_new_tokens (as the §6.1
        # length rule does) would warn that max_length was set too. The config is put back after each step.
        kept = copy.deepcopy(self.model.generation_config)
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        finally:
            self.model.generation_config = kept


def _forward_set_epoch(loader: DataLoader, sampler: TokenBatchSampler) -> None:
    """Make every epoch reach the TokenBatchSampler, however accelerate wraps it.

    With several processes the chain is DataLoaderShard -> BatchSamplerShard -> TokenBatchSampler, and a resumed
    epoch adds a SkipBatchSampler on top (`skip_first_batches`). Trainer calls `set_epoch` on the loader and on the
    loader's batch sampler's batch sampler, which after a resume is the BatchSamplerShard: it has no `set_epoch`, so
    the rest of a resumed epoch would replay epoch 0's order (examples repeated and skipped). Giving the shard a
    `set_epoch` that forwards closes the gap on both paths.
    """
    wrapper = getattr(loader, "batch_sampler", None)
    while wrapper is not None and wrapper is not sampler:
        if not hasattr(wrapper, "set_epoch"):
            wrapper.set_epoch = sampler.set_epoch
        wrapper = getattr(wrapper, "batch_sampler", None)
