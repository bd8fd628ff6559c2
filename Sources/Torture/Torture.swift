// Torture module
