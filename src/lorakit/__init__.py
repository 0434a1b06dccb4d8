"""lorakit"""
