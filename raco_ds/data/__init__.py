"""Preference data: objectives spec, loaders, tokenisation, batches and sampling.

Typical use::

    spec = get_preset("pku_saferlhf")                   # or DatasetSpec(...), trl_spec([...]),
                                                         # get_preset("PKU-Alignment/PKU-SafeRLHF") (the Hub)
    data = load_preference_data(spec)                    # validated pairs, labels per objective
    dataset = tokenize_preference_data(data, tokenizer, TokenizationConfig(max_length=512))
    sampler = DistributedPairSampler(len(dataset), world_size=W, rank=r, seed=0, batch_size=4)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler,
                        collate_fn=PreferenceCollator(dataset.pad_token_id, dataset.num_objectives))

The reference log-probs of the initial model come from the trainer
(raco_ds.trainer.reference), which scores the run's pairs once and keeps them
in the run folder.
"""

from raco_ds.data.batch import PreferenceBatch, PreferenceCollator
from raco_ds.data.formats import ScoredStats, parse_hh_transcript
from raco_ds.data.hub import HubSource
from raco_ds.data.loading import PreferenceData, content_hash, load_preference_data
from raco_ds.data.objectives import (
    PRESETS,
    DatasetSpec,
    ObjectiveSpec,
    bundled_data_dir,
    get_preset,
    resolve_dataset,
    select_objectives,
    trl_spec,
)
from raco_ds.data.records import DataError, InvalidRowError, Message, PreferencePair, RowRef, SkipLog
from raco_ds.data.sampler import DistributedPairSampler
from raco_ds.data.tokenization import (
    PreferenceDataset,
    TokenizationConfig,
    TokenizedPair,
    render_pair,
    tokenize_preference_data,
    truncate_pair,
)

__all__ = [
    "PRESETS",
    "DataError",
    "DatasetSpec",
    "DistributedPairSampler",
    "HubSource",
    "InvalidRowError",
    "Message",
    "ObjectiveSpec",
    "PreferenceBatch",
    "PreferenceCollator",
    "PreferenceData",
    "PreferenceDataset",
    "PreferencePair",
    "RowRef",
    "ScoredStats",
    "SkipLog",
    "TokenizationConfig",
    "TokenizedPair",
    "bundled_data_dir",
    "content_hash",
    "get_preset",
    "load_preference_data",
    "parse_hh_transcript",
    "render_pair",
    "resolve_dataset",
    "select_objectives",
    "tokenize_preference_data",
    "trl_spec",
    "truncate_pair",
]
