"""One LightningModule per architecture, each over plain nn.Modules."""
