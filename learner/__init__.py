"""The learner: DeepSpeed ranks in Ray actors that turn scored groups into GRPO
updates and stream the new weights to the generators. Imports only rollout/'s data
types and weight-transfer protocol."""
