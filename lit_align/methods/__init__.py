"""One LightningModule per method; the only place a ``training_step`` lives."""

from lit_align.methods.adversarial import ContinuousAdversarialModule
from lit_align.methods.base import PolicyModule, ReferencedPolicyModule
from lit_align.methods.classifier import ClassifierModule
from lit_align.methods.classifier_base import ClassifierBase
from lit_align.methods.classifier_unlearning import (
    ClassifierUnlearningModule,
    FineTune,
    GradientAscent,
    RandomLabels,
    UGradSL,
    UGradSLPlus,
    UnlearningRule,
)
from lit_align.methods.curry_dpo import CurryDPOModule
from lit_align.methods.debate import DebateModule
from lit_align.methods.dpo import DPOModule
from lit_align.methods.fewl_eval import FEWLEvaluationModule
from lit_align.methods.fis import FISModule
from lit_align.methods.game import AdversarialGameModule
from lit_align.methods.isara import SelfAlignmentModule
from lit_align.methods.online_dpo import OnlineDPOModule
from lit_align.methods.ppo import PPOModule
from lit_align.methods.reward_model import RewardModelModule
from lit_align.methods.sft import SFTModule
from lit_align.methods.staged import StagedPolicyModule
from lit_align.methods.summarization_eval import SummarizationEvaluationModule
from lit_align.methods.unlearning import UnlearningModule
from lit_align.methods.unlearning_assessment import (
    AssessmentAttacks,
    UnlearningAssessmentDataModule,
    UnlearningAssessmentModule,
)
from lit_align.methods.watermark import WatermarkModule

__all__ = ["AdversarialGameModule", "AssessmentAttacks", "ClassifierBase", "ClassifierModule", "ClassifierUnlearningModule", "ContinuousAdversarialModule", "CurryDPOModule", "DPOModule", "DebateModule", "FEWLEvaluationModule", "FISModule", "FineTune", "GradientAscent", "OnlineDPOModule", "PPOModule", "PolicyModule", "RandomLabels", "ReferencedPolicyModule", "RewardModelModule", "SFTModule", "SelfAlignmentModule", "StagedPolicyModule", "SummarizationEvaluationModule", "UGradSL", "UGradSLPlus", "UnlearningAssessmentDataModule", "UnlearningAssessmentModule", "UnlearningModule", "UnlearningRule", "WatermarkModule"]
