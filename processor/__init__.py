"""The points processor: gRPC service, commit pipeline and Postgres store of the alliance ledger."""
