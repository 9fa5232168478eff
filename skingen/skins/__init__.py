"""skins"""
