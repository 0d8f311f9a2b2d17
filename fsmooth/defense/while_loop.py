"""placeholder"""
def while_loop_unavailable_reason(device):
    return "not implemented yet"
