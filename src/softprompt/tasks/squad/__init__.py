"""tasks/squad"""
