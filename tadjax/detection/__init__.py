"""tadjax.detection"""
