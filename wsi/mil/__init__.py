"""Attention-MIL: models by name, cross-validated training, prediction with the fold ensemble.

>>> from wsi.mil import list_models
>>> list_models()
['abmil', 'clam_mb', 'clam_sb', 'transmil']
"""

from .data import Bag, Cohort, Fold, load_cohort, make_folds, read_labels
from .metrics import classification_metrics
from .models import MILModel, MILOutput, create_model, list_models, register_model
from .predict import Ensemble, PredictConfig, load_ensemble, predict
from .training import TrainConfig, train, train_fold

__all__ = [
    "Bag", "Cohort", "Ensemble", "Fold", "MILModel", "MILOutput", "PredictConfig", "TrainConfig",
    "classification_metrics", "create_model", "list_models", "load_cohort", "load_ensemble", "make_folds", "predict",
    "read_labels", "register_model", "train", "train_fold",
]
