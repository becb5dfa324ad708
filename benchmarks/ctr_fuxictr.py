"""The FuxiCTR side of benchmarks/ctr.py. Runs inside the benchmark's own virtual environment (fuxictr 2.3.x,
polars<2, a CPU torch), never inside ecomray's: `<venv>/bin/python benchmarks/ctr_fuxictr.py --data DIR --seed S
--work DIR`. Prints one JSON line: test AUC, log-loss, epochs and the wall time of each phase.

DeepFM is assembled from FuxiCTR's own parts, the way its model zoo's DeepFM is: `BaseModel` (training loop,
Adam, embedding regularizer, learning-rate decay on plateau, early stopping on valid AUC, best-weight restore),
`FeatureEmbedding`, `FactorizationMachine` (first-order LR + pairwise FM) and `MLP_Block`, with the BARS
DeepFM_frappe_x1 settings (frappe_x1/SOURCE.md and the BARS log): embedding 10, hidden [400, 400, 400], ReLU,
dropout 0.2, batch norm, embedding regularizer 0.05, lr 1e-3, batch 4096, patience 2, up to 100 epochs.
Features go through FuxiCTR's `FeatureProcessor` and `build_dataset` (vocabularies on train, min count 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

import torch

FIELDS = ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city"]
SETTINGS = {"embedding_dim": 10, "hidden_units": [400, 400, 400], "hidden_activations": "relu", "net_dropout": 0.2,
            "batch_norm": True, "embedding_regularizer": 0.05, "net_regularizer": 0, "learning_rate": 1e-3,
            "batch_size": 4096, "epochs": 100, "patience": 2}


def main() -> None:
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import FeatureProcessor, build_dataset
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel
    from fuxictr.pytorch.torch_utils import seed_everything

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="the frappe_x1 folder (train_reconstructed.csv, valid.csv, test.csv)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    s = SETTINGS

    class DeepFM(BaseModel):
        def __init__(self, feature_map, **kwargs):
            super().__init__(feature_map, model_id="DeepFM_frappe", gpu=-1,
                             embedding_regularizer=s["embedding_regularizer"],
                             net_regularizer=s["net_regularizer"], **kwargs)
            self.embedding_layer = FeatureEmbedding(feature_map, s["embedding_dim"])
            self.fm = FactorizationMachine(feature_map)
            self.mlp = MLP_Block(input_dim=feature_map.sum_emb_out_dim(), output_dim=1,
                                 hidden_units=s["hidden_units"], hidden_activations=s["hidden_activations"],
                                 dropout_rates=s["net_dropout"], batch_norm=s["batch_norm"])
            self.compile("adam", "binary_crossentropy", s["learning_rate"])
            self.reset_parameters()
            self.model_to_device()

        def forward(self, inputs):
            X = self.get_inputs(inputs)
            emb = self.embedding_layer(X)                           # (B, F, E)
            y = self.fm(X, emb) + self.mlp(emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(y)}

    t0 = time.time()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    seed_everything(args.seed)
    feature_cols = [{"name": FIELDS, "active": True, "dtype": "str", "type": "categorical"}]
    label_col = {"name": "label", "dtype": "float"}
    processor = FeatureProcessor(feature_cols=feature_cols, label_col=label_col, dataset_id="frappe_x1",
                                 data_root=args.work)
    paths = build_dataset(processor, train_data=os.path.join(args.data, "train_reconstructed.csv"),
                          valid_data=os.path.join(args.data, "valid.csv"),
                          test_data=os.path.join(args.data, "test.csv"), min_categr_count=1)
    feature_map = FeatureMap("frappe_x1", os.path.join(args.work, "frappe_x1"))
    feature_map.load(os.path.join(args.work, "frappe_x1", "feature_map.json"), {"embedding_dim": s["embedding_dim"]})
    t_features = time.time() - t0
    common = {"model_root": os.path.join(args.work, "models"), "verbose": 0, "metrics": ["AUC", "logloss"],
              "monitor": "AUC", "monitor_mode": "max", "early_stop_patience": s["patience"]}
    os.makedirs(os.path.join(common["model_root"], "frappe_x1"), exist_ok=True)   # where BaseModel checkpoints
    model = DeepFM(feature_map, **common)
    train_gen, valid_gen = RankDataLoader(feature_map, stage="train", train_data=paths[0], valid_data=paths[1],
                                          batch_size=s["batch_size"], shuffle=True, data_format="parquet")
    t1 = time.time()
    model.fit(train_gen, validation_data=valid_gen, epochs=s["epochs"], max_gradient_norm=10.0)
    t_train = time.time() - t1
    test_gen = RankDataLoader(feature_map, stage="test", test_data=paths[2], batch_size=s["batch_size"],
                              shuffle=False, data_format="parquet")
    valid = model.evaluate(valid_gen)
    test = model.evaluate(test_gen)
    print(json.dumps({"seed": args.seed, "test_auc": float(test["AUC"]), "test_logloss": float(test["logloss"]),
                      "val_auc": float(valid["AUC"]), "epochs": int(model._epoch_index + 1),
                      "features_s": round(t_features, 2), "train_s": round(t_train, 2),
                      "wall_s": round(time.time() - t0, 2), "threads": args.threads,
                      "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
