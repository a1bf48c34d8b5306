"""The AWS fleet: its configuration, the stack and how it is applied, the EC2
provider, the manager's lease, SSH key and bootstrap, and the manager's entry point."""
