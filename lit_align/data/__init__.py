"""DataModules, typed batches, record loading and the built-in tiny datasets."""

from lit_align.data.adversarial import AdversarialBehaviourDataModule
from lit_align.data.base import TokenizedDataModule
from lit_align.data.batches import AdversarialBatch, ForgetRetainBatch, PreferenceBatch, SequenceBatch
from lit_align.data.classification import (
    ActiveLearningSplit,
    ClassificationDataModule,
    ForgetSplit,
    HoldoutSplit,
    LabelOracle,
    Split,
    TrainStreams,
)
from lit_align.data.completion import (
    CompletionBatch,
    CompletionExample,
    TextCompletionDataModule,
    load_completion_records,
    retokenize,
)
from lit_align.data.fewl import FEWLBatch, FEWLDataModule, FEWLQuestion
from lit_align.data.fewshot import FewShotTemplate, build_fewshot_prompt, build_question_prompt
from lit_align.data.images import ImageClassificationDataModule
from lit_align.data.preference import PreferenceDataModule
from lit_align.data.prompts import PromptBatch, PromptDataModule, SeedPromptDataModule
from lit_align.data.ranked import RankedPreferenceDataModule, build_pairs
from lit_align.data.records import BUILTIN_DIR, DataSource, load_records
from lit_align.data.self_alignment import PoolRow, QuestionBatch, SelfAlignmentDataModule
from lit_align.data.sft import SFTDataModule
from lit_align.data.tabular import TabularDataModule
from lit_align.data.text_classification import TextClassificationDataModule
from lit_align.data.unlearning import (
    DEFAULT_REFUSALS,
    ForgetRetainDataModule,
    MUSEDataModule,
    PKUSafeRLHFDataModule,
    TOFUDataModule,
    WMDPDataModule,
)

__all__ = [
    "ActiveLearningSplit",
    "AdversarialBatch",
    "AdversarialBehaviourDataModule",
    "BUILTIN_DIR",
    "ClassificationDataModule",
    "CompletionBatch",
    "CompletionExample",
    "DEFAULT_REFUSALS",
    "DataSource",
    "FEWLBatch",
    "FEWLDataModule",
    "FEWLQuestion",
    "FewShotTemplate",
    "ForgetRetainBatch",
    "ForgetRetainDataModule",
    "ForgetSplit",
    "HoldoutSplit",
    "ImageClassificationDataModule",
    "LabelOracle",
    "MUSEDataModule",
    "PKUSafeRLHFDataModule",
    "PoolRow",
    "PreferenceBatch",
    "PreferenceDataModule",
    "PromptBatch",
    "PromptDataModule",
    "QuestionBatch",
    "RankedPreferenceDataModule",
    "SFTDataModule",
    "SeedPromptDataModule",
    "SelfAlignmentDataModule",
    "SequenceBatch",
    "Split",
    "TOFUDataModule",
    "TabularDataModule",
    "TextClassificationDataModule",
    "TextCompletionDataModule",
    "TokenizedDataModule",
    "TrainStreams",
    "WMDPDataModule",
    "build_fewshot_prompt",
    "build_pairs",
    "build_question_prompt",
    "load_completion_records",
    "load_records",
    "retokenize",
]
