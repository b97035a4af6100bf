"""The API's routes, one router per capability: generate (the typed endpoints and
/workflow), loras (the LoRA store), status (health, models, nodes, metrics); the playground's
page is in ryla.api.playground."""
