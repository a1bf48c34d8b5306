"""The app's panels: ProcessView, FleetView, SettingsView (CTkFrame subclasses)."""
